"""The ``lepton`` command line's flags: the argument parser of every subcommand, the job-flag tables,
and the settings the flags make (a ``JobSpec``, ``ServiceOptions``, loader options)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import structlog

from lepton import threads
from lepton.config import (
    ASYNC_LR_SCALINGS,
    GRADIENT_COMPRESSIONS,
    LR_SCHEDULES,
    MODES,
    PRECISIONS,
    TASKS,
    JobSpec,
    job_from_mapping,
    read_job_file,
)
from lepton.errors import ConfigError
from lepton.limits import DEFAULT_IDLE_S, DEFAULT_LIFETIME_S, DEFAULT_LIMITS
from lepton.ops.healthcheck import add_arguments as add_healthcheck_arguments
from lepton.process import ServiceOptions, shared_memory_by_env
from lepton.security import check_exposure, load_security

# flag -> JobSpec field
_JOB_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--dataset": (
        "dataset", str,
        "built-in dataset (digits, diabetes; synthetic-image and synthetic-text bring their recommended "
        "model, epochs, batch size, optimizer and lr), package.module:factory (also a module in the current "
        "directory) or path/to/file.py:factory",
    ),
    "--model": (
        "model", str,
        "built-in model (mlp, embedding-bag), package.module:factory (also a module in the current "
        "directory) or path/to/file.py:factory",
    ),
    "--loss": ("loss", str, "training loss: cross_entropy, nll, bce_with_logits, mse, l1, or package.module:factory"),
    "--task": ("task", str, f"what the job learns, which decides its metrics: {', '.join(TASKS)}"),
    "--epochs": ("epochs", int, "passes over the training set"),
    "--batch-size": ("batch_size", int, "samples per worker step"),
    "--lr": ("lr", float, "learning rate"),
    "--optimizer": ("optimizer", str, "torch.optim class name (sgd, adam, adamw, ...)"),
    "--mode": ("mode", str, f"consistency mode: {' or '.join(MODES)}"),
    "--shards": ("shards_per_epoch", int, "shards the training set is split into per epoch"),
    "--seed": ("seed", int, "seed of model initialisation and shuffling"),
    "--heartbeat-interval": ("heartbeat_interval_s", float, "seconds between heartbeats"),
    "--heartbeat-timeout": ("heartbeat_timeout_s", float, "seconds of silence before a member is declared dead"),
    "--checkpoint-every": ("checkpoint_every_steps", int, "parameter servers checkpoint every N updates (0: never)"),
    "--lease-timeout": ("lease_timeout_s", float, "seconds a shard lease lives without renewal (heartbeats, progress)"),
    "--staleness": ("staleness", int, "ssp: pushes a worker may run ahead of the slowest (0: lockstep)"),
    "--lr-schedule": ("lr_schedule", str, f"learning-rate schedule, in server updates: {', '.join(LR_SCHEDULES)}"),
    "--async-lr-scaling": (
        "async_lr_scaling", str,
        f"async: {' or '.join(ASYNC_LR_SCALINGS)}; staleness: a push staler than (workers - 1) gets its lr "
        "scaled by (workers - 1) / staleness (default)",
    ),
    "--eval-every-epochs": (
        "eval_every_epochs", int, "validate on the test split after every K epochs (0: only the final evaluation)",
    ),
    "--early-stopping-metric": (
        "early_stopping_metric", str,
        "end training once this validation metric stops improving: loss, accuracy, macro_recall, mse, mae, r2",
    ),
    "--early-stopping-patience": (
        "early_stopping_patience", int, "validations without improvement before early stopping (default 3)",
    ),
    "--feature-columns": (
        "feature_columns", lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
        "parquet:DIR and npy:DIR data sets: comma-separated feature columns (default: all but the label)",
    ),
    "--label-column": ("label_column", str, "parquet:DIR and npy:DIR data sets: the label column (default: label)"),
    "--device": ("device", str, "where workers train: auto (CUDA if present), cpu, cuda or cuda:N (default auto)"),
    "--precision": ("precision", str, f"workers' forward/backward precision: {', '.join(PRECISIONS)} (default fp32)"),
    "--clip-grad-norm": ("clip_grad_norm", float, "clip each push's whole-model gradient to this L2 norm (0: off)"),
    "--warmup-steps": ("warmup_steps", int, "linear lr warmup over this many server updates, times the schedule"),
    "--accumulate": ("accumulate", int, "batches whose mean gradient one push carries (gradient accumulation)"),
    "--gradient-compression": (
        "gradient_compression", str,
        f"compress pushed gradients, with error feedback: {', '.join(GRADIENT_COMPRESSIONS)} (default none)",
    ),
    "--topk-ratio": ("topk_ratio", float, "topk: fraction of each tensor's elements a push sends, in (0, 1]"),
}
# JSON-object flags: flag -> JobSpec field.
_JSON_FLAGS = {"--optimizer-kwargs": "optimizer_kwargs", "--lr-schedule-kwargs": "lr_schedule_kwargs"}


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "job (flags override --job FILE, which overrides the data set's recommended settings, "
        "then the defaults)"
    )
    g.add_argument("--job", metavar="FILE", help="job TOML file (JobSpec fields as keys)")
    for flag, (_, typ, text) in _JOB_FLAGS.items():
        g.add_argument(flag, type=typ, default=None, help=text)
    g.add_argument(
        "--optimizer-kwargs",
        metavar="JSON",
        default=None,
        help='extra optimizer arguments as a JSON object, e.g. \'{"momentum": 0.9}\'',
    )
    g.add_argument(
        "--lr-schedule-kwargs",
        metavar="JSON",
        default=None,
        help='schedule arguments as a JSON object, counts in updates: step {"step_size": 100, "gamma": 0.5}, '
        'cosine {"t_max": 1000, "eta_min": 0.0}',
    )


def job_from_args(args: argparse.Namespace, **overrides: Any) -> JobSpec:
    """The job of the flags, the ``--job`` file, the data set's recommended settings and JobSpec's
    defaults, in that order of precedence (``lepton.config.job_from_mapping``)."""
    values: dict[str, Any] = read_job_file(args.job) if args.job else {}
    for flag, (name, _, _) in _JOB_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            values[name] = value
    for flag, name in _JSON_FLAGS.items():
        text = getattr(args, flag[2:].replace("-", "_"))
        if text:
            try:
                values[name] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{flag} is not JSON: {exc}") from exc
    values.update(overrides)
    spec = job_from_mapping(values)
    # A factory file is named absolutely from here on: every process of the job (children of
    # `lepton up`, workers told by the coordinator) loads the same file whatever its directory.
    from lepton.factories import absolute_factory, absolute_file_dataset

    return spec.replace(
        model=absolute_factory(spec.model), dataset=absolute_file_dataset(absolute_factory(spec.dataset)),
        loss=absolute_factory(spec.loss),
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    p.add_argument("--log-level", default="info")


def _add_client_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (tokens only from files or LEPTON_TOKEN, never flags)")
    g.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="CA bundle: verify servers (and, on servers, require client certificates)",
    )
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="this process's certificate chain")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="this process's private key")
    g.add_argument("--token-file", default=None, metavar="FILE", help="bearer token to send (default: $LEPTON_TOKEN)")


def _add_service(p: argparse.ArgumentParser, server: bool = True) -> None:
    _add_client_security(p)
    if server:
        p.add_argument(
            "--auth-file",
            default=None,
            metavar="TOML",
            help="token table to check (default: $LEPTON_AUTH_FILE; none: no authentication)",
        )
        p.add_argument("--no-reflection", action="store_true", help="turn gRPC server reflection off")
        p.add_argument(
            "--insecure", action="store_true",
            help="allow plaintext on a non-loopback --listen address (refused without it: exit 2)",
        )
        p.add_argument(
            "--rpc-limit", action="append", default=[], metavar="CLASS=LIMIT[:PER_PEER]",
            help="concurrent calls a class admits, and from one connection (classes: heartbeat, control, "
            "read, watch, data, steps; repeatable); beyond them: RESOURCE_EXHAUSTED",
        )
        p.add_argument(
            "--stream-idle-timeout", type=float, default=None, metavar="SECONDS",
            help=f"end a request stream (Push, PushPull) whose next message takes longer (default {DEFAULT_IDLE_S:g})",
        )
        p.add_argument(
            "--stream-lifetime", type=float, default=None, metavar="SECONDS",
            help=f"end a WatchJob or health Watch stream this long after it began (default {DEFAULT_LIFETIME_S:g})",
        )
    p.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help=f"torch intra-op threads (default: ${threads.ENV}, else the cores this process may use)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0: a free one)"
    )
    p.add_argument(
        "--metrics-host", default=None, help="metrics bind address (default: the --listen host, else 127.0.0.1)"
    )


def _add_no_shm(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-shm", action="store_true",
        help="never move tensors through shared memory with a co-located ps/worker, only gRPC "
        "(also: LEPTON_SHM=0, which `lepton up` passes to its children)",
    )


def service_options(args: argparse.Namespace) -> ServiceOptions:
    security = load_security(
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        token_file=args.token_file,
        auth_file=getattr(args, "auth_file", None),
    )
    listen = getattr(args, "listen", None)
    if listen is not None and check_exposure(listen, security, getattr(args, "insecure", False)):
        structlog.get_logger("lepton.security").warning(
            "serving_plaintext_to_the_network", listen=listen, why="--insecure"
        )
    listen_host = getattr(args, "listen", "127.0.0.1:0").rsplit(":", 1)[0] or "127.0.0.1"
    return ServiceOptions(
        security=security,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host or listen_host,
        reflection=not getattr(args, "no_reflection", False),
        shared_memory=not getattr(args, "no_shm", False) and shared_memory_by_env(),
        limits=DEFAULT_LIMITS.configured(
            getattr(args, "rpc_limit", None) or (),
            getattr(args, "stream_idle_timeout", None),
            getattr(args, "stream_lifetime", None),
        ),
    )


def _add_loader_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data loading (each worker's torch DataLoader over the shard it holds)")
    g.add_argument(
        "--loader-workers", type=int, default=0, metavar="N",
        help="processes making batches ahead of training (default 0: in the training thread)",
    )
    g.add_argument(
        "--prefetch", type=int, default=2, metavar="N", help="batches each loader process keeps ready (default 2)"
    )
    g.add_argument("--pin-memory", action="store_true", help="make batches in pinned (page-locked) memory")
    g.add_argument(
        "--no-overlap", action="store_true",
        help="push after backward and load each batch in turn, not overlapped with training (docs/training.md)",
    )


def loader_options(args: argparse.Namespace) -> Any:
    from worker.trainer import LoaderOptions

    if args.loader_workers < 0 or args.prefetch < 1:
        raise ConfigError("--loader-workers must be >= 0 and --prefetch >= 1")
    return LoaderOptions(workers=args.loader_workers, pin_memory=args.pin_memory, prefetch=args.prefetch)


def _add_member(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--id", default="", help="member id to (re)register under; default: assigned")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton", description="Distributed PyTorch training over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coordinator", help="run the coordinator of one job")
    c.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="port 0 picks a free port")
    c.add_argument("--parameter-servers", type=int, default=None, help="servers the job waits for")
    c.add_argument("--state-dir", default=None, help="durable job state (SQLite); a restart on it resumes the job")
    c.add_argument("--ready-file", default=None, help="write {address, pid} as JSON here once serving")
    _add_job_flags(c)
    _add_service(c)
    _add_common(c)

    s = sub.add_parser("ps", help="run a parameter server")
    _add_member(s)
    s.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    s.add_argument("--advertise", default="", metavar="HOST:PORT", help="address workers dial, if not --listen")
    s.add_argument(
        "--state-dir",
        default=None,
        help="checkpoints of this server; a restart with the same --id and --state-dir restores the newest",
    )
    s.add_argument("--ready-file", default=None)
    _add_service(s)
    _add_no_shm(s)
    _add_common(s)

    w = sub.add_parser("worker", help="run a worker")
    _add_member(w)
    w.add_argument("--ready-file", default=None, help="write {metrics, pid} as JSON here once started")
    w.add_argument(
        "--device", default=None, metavar="DEVICE",
        help="train on auto, cpu, cuda or cuda:N instead of the job's device; one this machine lacks exits 2",
    )
    w.add_argument(
        "--precision", default=None, choices=PRECISIONS, help="forward/backward precision instead of the job's",
    )
    w.add_argument(
        "--step-delay", type=float, default=0.0, metavar="SECONDS",
        help="test/demo hook, not for production: sleep this long before each push and before evaluating, "
        "making this worker slow on purpose (default 0)",
    )
    _add_loader_flags(w)
    _add_service(w, server=False)
    _add_no_shm(w)
    _add_common(w)

    u = sub.add_parser("up", help="run a whole local cluster (coordinator, servers, workers) and train")
    u.add_argument("--ps", type=int, default=2, help="parameter servers (default 2)")
    u.add_argument("--workers", type=int, default=3, help="workers (default 3)")
    u.add_argument(
        "--max-workers", type=int, default=None,
        help="most workers `lepton scale` may ask for (default: max(--workers, 8))",
    )
    u.add_argument("--coordinator-port", type=int, default=0, help="coordinator port (default: a free one)")
    u.add_argument("--state-dir", default=None, help="logs and state of every child (default: a temp dir)")
    u.add_argument("--report", default=None, metavar="PATH", help="write the JSON report here")
    u.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    u.add_argument(
        "--secure",
        action="store_true",
        help="TLS (mutual) and role tokens on every service, made fresh in the state dir",
    )
    u.add_argument(
        "--worker-delay", type=float, default=0.0, metavar="SECONDS",
        help="test/demo hook: worker-0 alone (also when restarted) sleeps this long before each push "
        "(`lepton worker --step-delay`), so one worker is slow on purpose (default 0)",
    )
    _add_loader_flags(u)
    _add_job_flags(u)
    _add_common(u)

    sc = sub.add_parser("scale", help="grow or shrink the workers of a running `lepton up`")
    sc.add_argument("--state-dir", required=True, help="the --state-dir of the running lepton up")
    sc.add_argument("--workers", type=int, required=True, help="worker count wanted (1 to its --max-workers)")
    sc.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for lepton up to acknowledge (default 30)"
    )

    st = sub.add_parser("status", help="show a running job as the coordinator sees it")
    st.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    _add_client_security(st)

    k = sub.add_parser("cancel", help="end a running job as FAILED (needs an admin token)")
    k.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    k.add_argument("--reason", required=True)
    _add_client_security(k)

    cp = sub.add_parser(
        "checkpoint", help="ask every parameter server for a coordinated checkpoint (needs an admin token)"
    )
    cp.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    cp.add_argument("--reason", default="", help="recorded in the manifest")
    cp.add_argument("--wait", action="store_true", help="wait until every server has written its file")
    cp.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
    _add_client_security(cp)

    ex = sub.add_parser("export", help="merge a checkpoint into one plain PyTorch state_dict file")
    ex.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="a `lepton up --state-dir`, a coordinator --state-dir, or a manifest JSON file")
    ex.add_argument("--out", required=True, metavar="PATH", help="where to torch.save the state_dict")
    ex.add_argument("--id", default="", help="checkpoint id (default: the newest complete one)")

    hc = sub.add_parser("healthcheck", help="exit 0 if a server answers SERVING to grpc.health.v1 Check, else 1")
    add_healthcheck_arguments(hc)

    ce = sub.add_parser(
        "certs", help="make a development CA, a certificate for every service, and role and member tokens (files 0600)"
    )
    ce.add_argument("--out", required=True, help="directory to write into")
    ce.add_argument(
        "--hosts", default="localhost,127.0.0.1", help="comma-separated DNS names and IPs the certificate covers"
    )
    ce.add_argument("--parameter-servers", type=int, default=2, help="member tokens ps-0.token... to make (default 2)")
    ce.add_argument("--workers", type=int, default=3, help="member tokens worker-0.token... to make (default 3)")
    return parser
