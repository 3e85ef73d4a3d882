"""SQL injection, from outside: sqlmap against the running app.

Every parameter that a client controls and that reaches (or could reach) SQL
gets sqlmap's PostgreSQL tests at level 2: boolean-based, error-based,
stacked, time-based and UNION (techniques BEUST), in batch mode, each run
bounded (2 s time-based delays, 10 s per request, one retry, 4 threads, and a
subprocess timeout). The delays cost nothing unless a payload really sleeps;
2 s rather than 1 s keeps a busy machine's slow answers (a login hashes its
password for about 80 ms, more under load) from looking like a sleep. The
test passes only if sqlmap tested every parameter asked for and found none
injectable; a test that could pass by testing nothing would prove nothing.

What reaches SQL, and so what these runs exercise:
- GET /api/search and GET /: `q` goes (whitespace-collapsed) into the search
  query; `language` and `page` are checked against a whitelist (en/da, 1-10)
  before any SQL, so their payloads get 422s (still tested: the check is the
  defence).
- POST /api/login: `username` goes into the lockout check (get_login_lock),
  then the user lookup (get_user_for_login) and the failure count
  (record_login_failure). After 5 failures for one username from 127.0.0.1
  the lockout check answers 429 and the lookup is skipped. Every distinct
  payload is its own username, so each reaches all three queries until it has
  failed 5 times (in our runs every answer is a 422); a repeated one would
  still reach the lockout query. `password` never reaches SQL (it is only
  hashed in Python); it is tested with a random username per request
  (--randomize), so that no lockout answers before the password check.
- POST /api/register: `username` and `email` go into insert_user. The email
  rule (one @, no whitespace) refuses payloads with spaces before any SQL, so
  the email run uses sqlmap's space2comment tamper (/**/ for spaces) to get
  its payloads into the INSERT. Each run randomizes the other field, so that
  inserts succeed and the stored rows prove the payloads got there.
"""

import re
import secrets
import subprocess

import psycopg
import pytest
from psycopg import sql

from .conftest import tool

RUN_TIMEOUT = 40  # seconds per sqlmap run (6 runs); each takes 2-9 s here, the file about 35 s
JSON = "Accept: application/json"
# The app's request log: "2026-11-26T23:28:09.623+00:00 GET /api/search 200 3.1ms 127.0.0.1"
ACCESS_LOG = re.compile(r"^\S+ (?:GET|POST|HEAD) (\S+) (\d{3}) [0-9.]+ms ", re.MULTILINE)


def sqlmap_command(sqlmap, url, params, output_dir, data=None, extra=()):
    """The sqlmap command line for one target (also used, outside the repository,
    to check that it finds a deliberately injectable endpoint)."""
    command = [
        sqlmap,
        "-u",
        url,
        "-p",
        ",".join(params),
        "--batch",
        "--level=2",
        "--risk=1",
        "--dbms=PostgreSQL",
        "--technique=BEUST",
        "--time-sec=2",
        "--threads=4",
        "--timeout=10",
        "--retries=1",
        f"--output-dir={output_dir}",
        "--flush-session",
        "--disable-coloring",
    ]
    if data is not None:
        command += ["--method=POST", f"--data={data}"]
    return command + list(extra)


def run_sqlmap(running_app, tmp_path, path, params, data=None, extra=()):
    """Run sqlmap once; return (its output, the app's answers to it counted by status)."""
    command = sqlmap_command(tool("sqlmap"), f"{running_app.base}{path}", params, tmp_path / "sqlmap", data, extra)
    seen = len(running_app.output())
    try:
        # stdin closed: sqlmap reads extra targets from a piped stdin.
        done = subprocess.run(
            command,
            check=False,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"sqlmap took more than {RUN_TIMEOUT} s:\n{exc.stdout or ''}\n{exc.stderr or ''}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"sqlmap exited with {done.returncode}:\n{output}"
    route = path.split("?")[0]
    requests = [status for logged, status in ACCESS_LOG.findall(running_app.output()[seen:]) if logged == route]
    counts = {status: requests.count(status) for status in sorted(set(requests))}
    print(f"sqlmap {route} {','.join(params)}: {len(requests)} requests, answers {counts}")
    # A payload that makes the app fail (500) or lose its database (503) is a finding too.
    assert not [status for status in requests if status.startswith("5")], f"{counts}\n{output}"
    return output, counts


def assert_not_injectable(output, place, params):
    """sqlmap tested each parameter to the end and found no injection point."""
    # "might be injectable" is the heuristic that sees a database error in the answer.
    for bad in (
        "is vulnerable",
        "identified the following injection point",
        "might be injectable",
        "sqlmap resumed the following injection point",
    ):
        assert bad not in output, f"sqlmap: {bad!r}:\n{output}"
    for param in params:
        assert f"testing for SQL injection on {place} parameter '{param}'" in output, output
        assert f"{place} parameter '{param}' does not seem to be injectable" in output, output
    assert "all tested parameters do not appear to be injectable" in output, output


@pytest.mark.parametrize("path", ["/api/search", "/"])
def test_search_parameters_are_not_injectable(running_app, tmp_path, path):
    params = ["q", "language", "page"]
    output, counts = run_sqlmap(
        running_app,
        tmp_path,
        f"{path}?q=search&language=en&page=1",
        params,
        extra=["--headers=" + JSON] if path.startswith("/api/") else [],
    )
    assert_not_injectable(output, "GET", params)
    assert counts.get("200", 0) > 50 and counts.get("422", 0) > 50, counts  # payloads searched, and refused


def test_login_username_is_not_injectable(running_app, app_database, tmp_path):
    base = f"sqlmap{secrets.token_hex(3)}"
    output, counts = run_sqlmap(
        running_app,
        tmp_path,
        "/api/login",
        ["username"],
        data=f"username={base}&password=secret123",
        extra=["--headers=" + JSON],
    )
    assert_not_injectable(output, "POST", ["username"])
    # The payloads went through the lockout check and the user lookup into the
    # failure count, as data: one row per distinct payload.
    with psycopg.connect(app_database) as conn:
        stored = conn.execute(
            "SELECT count(*) FROM login_failures WHERE username LIKE %s AND username <> %s", (f"{base}%", base)
        ).fetchone()[0]
    assert stored > 20, (stored, counts)


def test_login_password_is_not_injectable(running_app, tmp_path):
    output, counts = run_sqlmap(
        running_app,
        tmp_path,
        "/api/login",
        ["password"],
        data=f"username=sqlmap{secrets.token_hex(3)}&password=secret123",
        extra=["--headers=" + JSON, "--randomize=username"],
    )
    assert_not_injectable(output, "POST", ["password"])
    assert counts.get("422", 0) > 50 and "429" not in counts, counts  # checked, never locked out


@pytest.mark.parametrize(
    "field, other, extra",
    [
        ("username", "email", []),
        ("email", "username", ["--tamper=space2comment"]),
    ],
)
def test_register_fields_are_not_injectable(running_app, app_database, tmp_path, field, other, extra):
    # No 0 or 4 in the name: sqlmap 1.7's --randomize also rewrites digit runs
    # inside URL escapes, so a run "4", "0" or "40" in the email turned its
    # "%40" (the @) into another character, and every insert was refused.
    base = "sqlmap" + "".join(secrets.choice("12356789") for _ in range(8))
    data = f"username={base}&email={base}@example.org&password=secret123&password2=secret123"
    output, counts = run_sqlmap(
        running_app,
        tmp_path,
        "/api/register",
        [field],
        data=data,
        extra=["--headers=" + JSON, f"--randomize={other}", *extra],
    )
    assert_not_injectable(output, "POST", [field])
    # The payloads were stored verbatim as accounts: data, never SQL.
    pattern = f"{base}%" if field == "username" else f"{base}@example.org%"
    query = sql.SQL("SELECT {0} FROM users WHERE {0} LIKE %s").format(sql.Identifier(field))
    with psycopg.connect(app_database) as conn:
        stored = [value for (value,) in conn.execute(query, (pattern,))]
    payloads = [value for value in stored if re.search(r"['\"()]", value)]
    assert len(payloads) > 20, (len(stored), counts)
