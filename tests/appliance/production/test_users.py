"""Accounts: scrypt hashing, constant-time verification, lockout, bootstrap, and the role table."""

from __future__ import annotations

import base64
import functools
import json
import re
from pathlib import Path

import pytest

from appliance.production import users
from appliance.production.users import PERMISSIONS, AuthError, Permission, Role, User, UserError
from tests.appliance.conftest import TEST_COST
from tests.appliance.production.conftest import PASSWORD, Floor

DOCS = Path(__file__).resolve().parents[3] / "docs" / "production.md"


def test_hash_is_scrypt_at_the_owasp_parameters_with_a_random_salt() -> None:
    a, b = users.hash_password("123456789"), users.hash_password("123456789")
    assert a != b  # a fresh 16-byte salt each time
    kind, n, r, p, salt, digest = a.split("$")
    # OWASP Password Storage Cheat Sheet: N=2^17, r=8, p=1 (the default; nothing configures it lower).
    assert (kind, int(n), int(r), int(p)) == ("scrypt", 2**17, 8, 1)
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
    assert users.verify_password("123456789", a) and users.verify_password("123456789", b)
    assert not users.verify_password("123456780", a)
    assert not users.verify_password("123456789", "plain$text")
    assert "123456789" not in a


@pytest.mark.parametrize(
    "params",
    ["1048576$8$1", "131072$1024$1", "131072$8$1000", "1000$8$1", "0$8$1", "-2$8$1", "2$0$1", "x$8$1"],
)
def test_a_stored_hash_with_odd_or_huge_parameters_is_refused_without_running_it(params: str) -> None:
    """The stored hash is data in the journal: parameters that would take gigabytes are never run."""
    good = users.hash_password("123456789", cost=TEST_COST)
    tampered = "scrypt$" + params + "$" + good.split("$", 4)[4]
    assert users.stored_cost(tampered) is None
    assert not users.verify_password("123456789", tampered)


def test_a_login_over_a_weaker_hash_stores_one_at_the_current_cost(floor: Floor) -> None:
    """The floor's accounts were made at TEST_COST (2^10): a right login moves them to OWASP's 2^17, once; a
    wrong one does not."""

    def stored() -> str:
        return str(floor.journal.call(lambda: floor.journal.conn.execute(
            "SELECT password_hash FROM users WHERE name='sam'").fetchone()[0]))  # fmt: skip

    weak = stored()
    assert users.stored_cost(weak) == TEST_COST
    with pytest.raises(AuthError):
        users.login(floor.journal, floor.audit, "sam", "wrong password")
    assert stored() == weak
    users.login(floor.journal, floor.audit, "sam", PASSWORD)
    strong = stored()
    assert users.stored_cost(strong) == users.OWASP_SCRYPT and users.verify_password(PASSWORD, strong)
    users.login(floor.journal, floor.audit, "sam", PASSWORD)
    assert stored() == strong  # not hashed again
    success = [json.loads(e.data) for e in floor.audit.entries() if e.event == "login.success"]
    assert success[0]["rehashed"] == {"from": "scrypt$1024$8$1", "to": "scrypt$131072$8$1"}
    assert "rehashed" not in success[1]
    assert PASSWORD not in "".join(e.data for e in floor.audit.entries())


def test_login_right_and_wrong_password_both_audited(floor: Floor) -> None:
    login = functools.partial(users.login, floor.journal, floor.audit, cost=TEST_COST)
    assert login("sam", PASSWORD) == User("sam", Role.SUPERVISOR)
    with pytest.raises(AuthError):
        login("sam", "wrong password")
    with pytest.raises(AuthError):
        login("nobody", PASSWORD)
    events = [(e.actor, e.event) for e in floor.audit.entries() if e.event.startswith("login")]
    assert events == [("sam", "login.success"), ("sam", "login.failure"), ("nobody", "login.failure")]
    stored = floor.journal.call(
        lambda: floor.journal.conn.execute("SELECT password_hash FROM users WHERE name='sam'").fetchone()[0]
    )
    assert stored.startswith("scrypt$") and PASSWORD not in stored


def test_lockout_after_repeated_failures_even_for_the_right_password(floor: Floor) -> None:
    t = [1000.0]
    for _ in range(users.LOCKOUT_FAILURES):
        with pytest.raises(AuthError):
            users.login(floor.journal, floor.audit, "olga", "guess guess", clock=lambda: t[0], cost=TEST_COST)
    with pytest.raises(AuthError, match="locked"):
        users.login(floor.journal, floor.audit, "olga", PASSWORD, clock=lambda: t[0] + 10, cost=TEST_COST)
    assert any(e.event == "login.lockout" for e in floor.audit.entries())
    t[0] += users.LOCKOUT_SECONDS + 1
    assert (
        users.login(floor.journal, floor.audit, "olga", PASSWORD, clock=lambda: t[0], cost=TEST_COST).role
        is Role.OPERATOR
    )


def test_disabled_account_cannot_log_in(floor: Floor) -> None:
    users.set_enabled(floor.journal, floor.audit, floor.admin, "olga", False)
    with pytest.raises(AuthError, match="disabled"):
        users.login(floor.journal, floor.audit, "olga", PASSWORD, cost=TEST_COST)
    with pytest.raises(AuthError):
        users.set_enabled(floor.journal, floor.audit, floor.supervisor, "olga", True)


def test_bootstrap_only_when_no_users_exist(floor: Floor) -> None:
    with pytest.raises(UserError, match="already exist"):
        users.bootstrap(floor.journal, floor.audit, "mallory", PASSWORD)


def test_only_administrators_manage_users_and_passwords(floor: Floor) -> None:
    with pytest.raises(AuthError):
        users.add_user(floor.journal, floor.audit, floor.supervisor, "eve", Role.ADMINISTRATOR, PASSWORD)
    with pytest.raises(AuthError):
        users.set_password(floor.journal, floor.audit, floor.operator, "sam", "new password 1")
    users.set_password(floor.journal, floor.audit, floor.operator, "olga", "new password 1", cost=TEST_COST)
    assert users.login(floor.journal, floor.audit, "olga", "new password 1", cost=TEST_COST).name == "olga"
    with pytest.raises(UserError):
        users.add_user(floor.journal, floor.audit, floor.admin, "short", Role.OPERATOR, "1234")


def test_docs_role_table_matches_the_code() -> None:
    text = DOCS.read_text()
    rows = dict(re.findall(r"^\| `([a-z.]+)` \| ([^|]+) \|", text, re.M))
    for perm in Permission:
        documented = {r.strip() for r in rows[perm.value].split(",")}
        assert documented == {r.value for r in PERMISSIONS[perm]}, perm
