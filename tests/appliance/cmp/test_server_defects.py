"""A defect in the CMP server that some request hits (a client may send it in a loop) is answered
systemFailure every time and logged with its traceback once, not once per request. The defect is injected
(pytest-mock): a real one is a bug, which the code does not have on purpose."""

from __future__ import annotations

import logging

import pytest
from pytest_mock import MockerFixture

from appliance.cmp import ErrorBody, FailInfo, parse_message
from appliance.cmp.server import CmpResponder
from tests.appliance.cmp.test_server import Srv, _ir, _post, srv  # noqa: F401 - srv is the fixture

REQUESTS = 10


async def test_a_defect_hit_by_every_request_is_logged_once(
    srv: Srv,  # noqa: F811 - the fixture imported above
    mocker: MockerFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mocker.patch.object(CmpResponder, "_dispatch", side_effect=RuntimeError("a defect"))
    with caplog.at_level(logging.WARNING):
        for i in range(REQUESTS):
            status, body = await _post(srv, _ir(f"SN-00{30 + i}").der)
            answer = parse_message(body)
            assert status == 200 and isinstance(answer.body, ErrorBody)
            assert answer.body.status.fail_info == {FailInfo.SYSTEM_FAILURE}
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "Traceback" in lines[0] and "a defect" in lines[0], lines
    assert srv.responder.stats["errors"] == REQUESTS
