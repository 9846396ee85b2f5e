"""Every log line names the process's role and member, from whichever thread writes it, and audit
lines name the caller's token role apart from it."""

from __future__ import annotations

import json
import threading

import pytest
import structlog

from lepton import logs
from lepton.logs import bind, configure_logging


@pytest.fixture(autouse=True)
def default_logging():
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logs._PROCESS_FIELDS.clear()


def test_lines_from_other_threads_carry_the_role_and_member(capsys):
    configure_logging("json", "info", role="ps")
    bind(member="ps-3", incarnation=2)
    log = structlog.get_logger("lepton.test")
    log.info("from_main")
    thread = threading.Thread(target=lambda: log.info("job_over", state="JOB_STATE_SUCCEEDED"))
    thread.start()
    thread.join(5)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == ["from_main", "job_over"]
    for line in lines:
        assert (line["role"], line["member"], line["incarnation"]) == ("ps", "ps-3", 2)


def test_a_lines_own_field_wins_and_configuring_again_forgets_the_old_fields(capsys):
    configure_logging("json", "info", role="coordinator")
    bind(member="coordinator")
    structlog.get_logger("lepton.audit").info("audit", caller_role="worker", principal="w")
    configure_logging("json", "info", role="worker")
    structlog.get_logger("lepton.test").info("fresh")
    audit, fresh = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert (audit["role"], audit["member"], audit["caller_role"]) == ("coordinator", "coordinator", "worker")
    assert fresh["role"] == "worker" and "member" not in fresh
