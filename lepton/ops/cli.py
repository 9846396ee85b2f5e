"""The ``lepton`` command line: one subcommand per role, plus the operator commands (``up``, ``status``,
``scale``, ``checkpoint``, ``export``, ``certs``, ``healthcheck``, ...).

Only this module and ``lepton.ops.flags`` (the parser and the settings the flags make) read flags;
this one dispatches each command and hands the settings to each role's ``serve``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

# Read once, when grpc is first imported, so before anything below imports it. Lepton never uses gRPC
# across a fork, and with fork support on, grpcio >= 1.81 can abort a child that `lepton up` forks
# (subprocess with preexec_fn) before it execs, when the launcher's own calls are in flight
# (grpc/grpc#43055: "epoll_wait error: Bad file descriptor", exit -6).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from lepton import threads
from lepton.errors import ConfigError, LeptonError
from lepton.logs import configure_logging
from lepton.ops.flags import build_parser, job_from_args, loader_options, service_options
from lepton.process import (
    EXIT_CONFIG,
    EXIT_LOST_CONTACT,
    record_peak_rss,
    stop_event_on_signals,
    write_ready_file,
)
from lepton.security import Security, load_security

__all__ = ["build_parser", "job_from_args", "loader_options", "main", "service_options"]


def _client_security(args: argparse.Namespace) -> Security:
    return load_security(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, token_file=args.token_file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"lepton {args.command}: {exc}", file=sys.stderr, flush=True)
        # A launcher waiting on the ready file (`lepton up`) reads the refusal there.
        write_ready_file(getattr(args, "ready_file", None), error=str(exc))
        return EXIT_CONFIG
    finally:
        if args.command in ("coordinator", "ps", "worker"):
            record_peak_rss(getattr(args, "ready_file", None))
        # The interpreter's collections at exit walk every object torch, the data set and gRPC made:
        # seconds on a busy machine, during which a supervisor's SIGTERM finds the default handler
        # restored (exit -15). Nothing left needs collecting, so exit without walking them.
        gc.freeze()


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "status":
        from lepton.ops.status import show_status

        return show_status(args.coordinator, as_json=args.json, security=_client_security(args))
    if args.command == "cancel":
        from lepton.ops.status import cancel_job

        return cancel_job(args.coordinator, args.reason, security=_client_security(args))
    if args.command == "checkpoint":
        from lepton.ops.checkpoint_request import request_checkpoint

        return request_checkpoint(
            args.coordinator, args.reason, wait_s=args.timeout if args.wait else None, security=_client_security(args)
        )
    if args.command == "export":
        from lepton.ops.export import export_checkpoint

        result = export_checkpoint(args.checkpoint, args.out, args.id)
        print(
            f"exported {result.checkpoint_id} ({len(result.tensors)} tensors, versions "
            f"{', '.join(f'{s}@{v}' for s, v in result.versions.items())}) to {result.out}"
        )
        return 0
    if args.command == "scale":
        from lepton.errors import DeadlineExceeded
        from lepton.ops.scale import request_scale

        try:
            before, after = request_scale(args.state_dir, args.workers, args.timeout)
        except DeadlineExceeded as exc:
            print(f"lepton scale: {exc}", file=sys.stderr)
            return EXIT_LOST_CONTACT
        print(f"workers: {before} -> {after}")
        return 0
    if args.command == "healthcheck":
        from lepton.ops.healthcheck import probe

        if args.timeout <= 0:
            raise ConfigError("--timeout must be > 0")
        return probe(args)
    if args.command == "certs":
        from lepton.ops.certs import make_dev_pki

        if args.parameter_servers < 0 or args.workers < 0:
            raise ConfigError("--parameter-servers and --workers must be >= 0")
        files = make_dev_pki(
            args.out, [h.strip() for h in args.hosts.split(",") if h.strip()], args.parameter_servers, args.workers
        )
        for role, path in files.items():
            print(f"{role:<12} {path}")
        return 0
    if args.command == "up":
        from lepton.ops.cluster import Cluster
        from lepton.ops.launcher import run_up

        spec = job_from_args(args, parameter_servers=args.ps)
        if args.workers < 1 or args.ps < 1:
            raise ConfigError("--workers and --ps must be >= 1")
        cluster = Cluster(
            spec=spec,
            workers=args.workers,
            max_workers=args.max_workers,
            coordinator_port=args.coordinator_port,
            state_dir=args.state_dir,
            log_format=args.log_format,
            secure=args.secure,
            worker_delay_s=args.worker_delay,
            loader=loader_options(args),
            overlap=not args.no_overlap,
        )
        configure_logging(args.log_format if args.log_format != "auto" else "console", args.log_level, role="up")
        return run_up(cluster, report_path=args.report, timeout_s=args.timeout)
    try:
        threads.apply(args.threads)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    configure_logging(args.log_format, args.log_level, role=args.command)
    stop = stop_event_on_signals()
    if args.command == "coordinator":
        from coordinator.main import serve as serve_coordinator

        overrides = {} if args.parameter_servers is None else {"parameter_servers": args.parameter_servers}
        spec = job_from_args(args, **overrides)
        return serve_coordinator(
            spec, args.listen, stop, ready_file=args.ready_file, options=service_options(args), state_dir=args.state_dir
        )
    if args.command == "ps":
        from ps_server.main import serve as serve_ps

        return serve_ps(
            args.coordinator,
            args.listen,
            stop,
            advertise=args.advertise,
            member_id=args.id,
            ready_file=args.ready_file,
            options=service_options(args),
            state_dir=args.state_dir,
        )
    if args.command == "worker":
        from worker.main import serve as serve_worker

        return serve_worker(
            args.coordinator, stop, member_id=args.id, ready_file=args.ready_file, options=service_options(args),
            step_delay_s=args.step_delay, loader=loader_options(args), device=args.device, precision=args.precision,
            overlap=not args.no_overlap,
        )
    raise AssertionError(args.command)


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except LeptonError as exc:
        print(f"lepton: {exc}", file=sys.stderr)
        sys.exit(EXIT_LOST_CONTACT)
