"""Screenshot the Dagster UI's page for the sample pipeline's ``churn_reasons`` RLM asset.

Run from anywhere, with the package and ``dagster-webserver`` installed::

    python docs/screenshot.py [--out docs/asset_page.png]

What it does, all on 127.0.0.1 and in a temporary directory (the repo's data/warehouse.duckdb
and your ~/.dagster are left alone):

1. makes a ``DAGSTER_HOME`` and a warehouse file, then runs
   ``dagster asset materialize -f definitions.py --select '*'`` with ``RLM_WAREHOUSE`` set and
   ``ANTHROPIC_API_KEY`` removed, so the RLM assets run on the offline, labelled demo model
   (``rlm/provider: demo``) and the picture is the same on every machine;
2. starts ``dagster-webserver`` on a free port;
3. finds a Chromium (``/usr/bin/chromium`` or on ``PATH``); when there is none and the script
   runs as root on Debian/Ubuntu, installs the ``chromium`` package with apt-get and says so;
4. loads the asset page in headless Chromium (no sandbox, no GPU, no background networking,
   a throwaway profile), first dumping the rendered DOM to check that the metadata has
   appeared — the UI is a JavaScript app, so it retries with more virtual time while it only
   shows a loader — then writes the PNG: the metadata table of the latest materialization
   (provider, models, tokens and USD per model, row count, schema);
5. the answer and the trajectory are Markdown longer than the UI shows inline (a
   ``[Show Markdown]`` link), so it drives the same headless Chromium over the DevTools
   protocol (``--remote-debugging-pipe``: a pipe, no port) to click each link, and saves each
   dialog next to the PNG as ``<out>_answer.png`` and ``<out>_trajectory.png``;
6. materializes an asset that fails after it started (the demo's churn program given one
   turn), serves it, and saves its Events tab as ``<out>_failed_run.png``: the failed run's
   error and trajectory are on the asset's page (an observation);
7. stops the webserver and prints the PNGs' paths.

The temporary ``dagster.yaml`` switches off telemetry and the UI's first-visit
"Join the Dagster community" dialog, which would otherwise cover the page.

The test suite does not need any of this: ``tests/test_webserver.py`` checks the same
metadata over the webserver's GraphQL API without a browser.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFINITIONS = REPO / "definitions.py"
ASSET = "churn_reasons"
# What the rendered page must contain before it is worth a picture.
EXPECTED_TEXT = ("rlm/answer", "rlm/trajectory", "rlm/provider")
DAGSTER_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
nux:
  enabled: false
"""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-proxy-server",
    "--hide-scrollbars",
]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def log(message: str) -> None:
    print(f"[screenshot] {message}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def materialize(env: dict[str, str]) -> None:
    command = [
        sys.executable,
        "-m",
        "dagster",
        "asset",
        "materialize",
        "-f",
        str(DEFINITIONS),
        "--select",
        "*",
    ]
    log("materializing the sample pipeline: " + " ".join(command[2:]))
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"materialization failed:\n{(proc.stdout + proc.stderr)[-4000:]}")


FAILING_DEFS = """
import os
import dagster as dg
from dagster_duckdb import DuckDBResource
from rlm_dagster import RLMResource, rlm_asset

# The demo's churn program needs three turns; with one, the run ends without an answer.
churn_reasons_failed = rlm_asset(
    name="churn_reasons_failed",
    question="Which enterprise customers threatened to cancel, in which ticket, and why?",
    tables=["tickets", "customers"],
    output={"customer_id": "BIGINT", "customer_name": "VARCHAR", "ticket_id": "BIGINT",
            "reason": "VARCHAR"},
    max_iterations=1,
    retry_policy=None,
)
defs = dg.Definitions(
    assets=[churn_reasons_failed],
    resources={"duckdb": DuckDBResource(database=os.environ["RLM_WAREHOUSE"]),
               "rlm": RLMResource(provider="demo")},
)
"""


def materialize_failing(env: dict[str, str], work: Path) -> Path:
    """A run that fails after it started (no final answer within one turn), so its page
    shows what a failed run leaves on the asset; returns its definitions file."""
    defs = work / "failing.py"
    defs.write_text(FAILING_DEFS)
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-f", str(defs)]
    command += ["--select", "churn_reasons_failed"]
    log("materializing an asset that fails: " + " ".join(command[2:]))
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        sys.exit("the failing asset succeeded; the failed-run screenshot needs a failure")
    return defs


def graphql(base: str, query: str) -> dict[str, object]:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with _OPENER.open(request, timeout=30) as response:
        payload: dict[str, object] = json.loads(response.read())
    return payload


def wait_until_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Poll /server_info, then until the code location has loaded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the webserver exited with {proc.returncode}")
        try:
            with _OPENER.open(f"{base}/server_info", timeout=5):
                pass
            repos = graphql(base, "{ repositoriesOrError { __typename } }")
            if "RepositoryConnection" in json.dumps(repos):
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    sys.exit(f"the webserver at {base} was not ready within {timeout_s:.0f} s")


@contextlib.contextmanager
def webserver(env: dict[str, str], logfile: Path, definitions: Path = DEFINITIONS) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "dagster_webserver",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-f",
        str(definitions),
    ]
    log(f"starting the webserver on {base} (log: {logfile})")
    with logfile.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_ready(base, proc)
        yield base
    finally:
        log("stopping the webserver")
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its code server, in the group it leads


def find_chromium() -> str:
    """Path to Chromium, installing Debian's ``chromium`` package when it is missing."""
    for candidate in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(candidate)
        if found:
            return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(
            "Chromium is not installed. Install it (Debian/Ubuntu: `apt-get install chromium`) "
            "and run this script again."
        )
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        log("Chromium is missing; running: " + " ".join(command))
        subprocess.run(
            command,
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )
    found = shutil.which("chromium")
    if not found:
        sys.exit("apt-get installed the chromium package, but no `chromium` is on PATH")
    return found


def chromium(browser: str, profile: Path, size: str, budget_ms: int, *args: str) -> str:
    command = [
        browser,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={size}",
        f"--virtual-time-budget={budget_ms}",
        *args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120 + budget_ms / 1000)
    if proc.returncode != 0:
        sys.exit(f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def screenshot(
    browser: str,
    url: str,
    out: Path,
    work: Path,
    size: str,
    expected: tuple[str, ...] = EXPECTED_TEXT,
) -> None:
    """Wait (in virtual time) until the page shows the metadata, then take the picture."""
    for attempt, budget_ms in enumerate((15_000, 30_000, 60_000), start=1):
        dom = chromium(browser, work / f"profile-dom-{attempt}", size, budget_ms, "--dump-dom", url)
        missing = [text for text in expected if text not in dom]
        if not missing:
            break
        log(f"after {budget_ms} ms of virtual time the page lacks {missing}; retrying")
    else:
        sys.exit(f"the page at {url} never showed {list(expected)}")
    log(f"the page has rendered; screenshotting {url}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    chromium(browser, work / "profile-shot", size, budget_ms, f"--screenshot={out}", url)
    if not out.is_file() or out.stat().st_size == 0:
        sys.exit(f"chromium wrote no screenshot to {out}")


class DevTools:
    """The Chrome DevTools Protocol over ``--remote-debugging-pipe``: Chromium reads commands
    from its fd 3 and writes replies to its fd 4, NUL-separated JSON. No port, no websocket
    library; used only where the UI needs a click (Markdown metadata opens in a dialog)."""

    def __init__(self, browser: str, profile: Path, size: str) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Park the child's ends above 4 so that moving them onto 3 and 4 cannot clobber them.
        child_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        child_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        for fd in (to_child_r, from_child_w):
            os.close(fd)

        def move_fds() -> None:  # runs in the child, before exec
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self._proc = subprocess.Popen(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=move_fds,
        )
        os.close(child_r)
        os.close(child_w)
        self._out, self._in = to_child_w, from_child_r
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        width, height = (int(v) for v in size.split(","))
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None and method.split(".")[0] not in ("Target", "Browser"):
            message["sessionId"] = self._session  # page commands go to the attached tab
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") != self._next_id:
                    continue  # an event, or a reply to another session
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._in], [], [], remaining)[0]:
                raise TimeoutError(f"chromium did not answer {method} within {timeout_s} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited while answering {method}")
            self._buffer += chunk

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return reply.get("result", {}).get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not show {what} within {timeout_s:.0f} s")
            time.sleep(0.25)

    def screenshot(self, out: Path, clip: dict[str, float] | None = None) -> None:
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        data = self.call("Page.captureScreenshot", **params)["data"]
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.call("Browser.close", timeout_s=5)
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)


# Click "[Show Markdown]" in the metadata row with this label; the UI opens a dialog.
# Markdown longer than 1,000 characters is never shown inline by the Dagster UI.
_OPEN_MARKDOWN = """
(() => {
  const row = [...document.querySelectorAll('tr')]
    .find(r => r.cells.length > 1 && r.cells[0].innerText.trim() === LABEL);
  if (!row) return 'no row labelled ' + LABEL;
  row.scrollIntoView({block: 'center'});
  const link = [...row.querySelectorAll('*')]
    .find(e => e.children.length === 0 && e.textContent.trim() === '[Show Markdown]');
  if (!link) return 'no [Show Markdown] in the row ' + LABEL;
  link.click();
  return 'ok';
})()
"""
_DIALOG_RECT = """
(() => {
  const d = document.querySelector('[role=dialog]');
  if (!d || !d.innerText.includes(LABEL)) return null;
  const r = d.getBoundingClientRect();
  return {x: r.x, y: r.y, width: r.width, height: r.height};
})()
"""


def markdown_dialogs(browser: str, url: str, out: Path, work: Path, size: str) -> list[Path]:
    """Screenshot the dialogs that show the answer and the trajectory (they need a click)."""
    shots: list[Path] = []
    tools = DevTools(browser, work / "profile-devtools", size)
    try:
        for label, suffix in (("rlm/answer", "answer"), ("rlm/trajectory", "trajectory")):
            tools.call("Page.navigate", url=url)
            tools.wait_for(
                f"document.body.innerText.includes({json.dumps(label)})", f"the row {label}"
            )
            clicked = tools.evaluate(_OPEN_MARKDOWN.replace("LABEL", json.dumps(label)))
            if clicked != "ok":
                sys.exit(f"could not open {label}: {clicked}")
            rect_js = _DIALOG_RECT.replace("LABEL", json.dumps(label))
            tools.wait_for(rect_js, f"the {label} dialog")
            time.sleep(1.0)  # let the dialog's opening transition finish
            rect = tools.evaluate(rect_js)
            shot = out.with_name(f"{out.stem}_{suffix}{out.suffix}")
            tools.screenshot(shot, clip=rect)
            log(f"{label}: clicked [Show Markdown], captured the dialog")
            shots.append(shot)
    finally:
        tools.close()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "asset_page.png")
    parser.add_argument(
        "--path",
        default=f"/assets/{ASSET}?view=events",
        help="the UI path to capture (default: the asset's Events tab, which shows the "
        "latest materialization's metadata)",
    )
    parser.add_argument("--window-size", default="1600,3400")
    args = parser.parse_args()
    out: Path = args.out.resolve()

    with tempfile.TemporaryDirectory(prefix="rlm-screenshot-") as tmp:
        work = Path(tmp)
        home = work / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(DAGSTER_YAML)
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
        env.update(
            DAGSTER_HOME=str(home),
            RLM_WAREHOUSE=str(work / "warehouse.duckdb"),
            RLM_CACHE_PATH=str(work / "rlm-cache.sqlite3"),
        )
        materialize(env)
        browser = find_chromium()
        with webserver(env, work / "webserver.log") as base:
            screenshot(browser, base + args.path, out, work, args.window_size)
            extra = markdown_dialogs(browser, base + args.path, out, work, args.window_size)
        # a failed run's page: its error and trajectory are on the asset (an observation)
        failing = materialize_failing(env, work)
        failed_out = out.with_name(out.stem + "_failed_run.png")
        with webserver(env, work / "webserver-failed.log", failing) as base:
            path = "/assets/churn_reasons_failed?view=events"
            expected = ("failed run: NoFinalAnswer", "rlm/trajectory", "rlm/error")
            screenshot(browser, base + path, failed_out, work, args.window_size, expected)
        extra.append(failed_out)
    for path in (out, *extra):
        print(path)


if __name__ == "__main__":
    main()
