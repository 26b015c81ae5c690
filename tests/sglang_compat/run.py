"""Run SGLang's OpenAI-server test files, unchanged, against radixserve, one file at a time.

    python tests/sglang_compat/run.py TESTS_DIR [--out DIR] [--timeout-per-file S] [--only SUBSTR ...]
                                      [--skip SUBSTR ...] [--unknown-flags pass|drop] [--list]

TESTS_DIR is a copy of SGLang's test/srt/openai_server/ (basic/, features/, validation/, function_call/,
and _kits/kit_matched_stop.py). Each server-driving file runs in its own process under unittest (as SGLang
runs them: `python3 file.py`), with tests/sglang_compat/shim first on PYTHONPATH so that `import sglang`
gets the shim, which starts `python -m radixserve.launch_server`. A file that drives no server (a unit test
of SGLang's own Python classes) is listed as not applicable and not run.

Writes to --out (default /tmp/sglang_compat_results): <file>.log (test and server output), results.json
(every test: outcome, seconds, message), summary.md (a table), and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(HERE, "shim")

# what a server-driving file calls; a file with none of these only unit-tests SGLang's own classes
SERVER_MARKERS = ("popen_launch_server", "popen_launch_router_with_grpc_worker", "popen_launch_pd_server")


# ---- one file, in a child process ------------------------------------------------------------------
class _RecordingResult(unittest.TextTestResult):
    """TextTestResult that also writes every outcome to a JSON file as it happens (so a file killed by
    its timeout still leaves the outcomes of the tests that finished)."""

    def __init__(self, stream, descriptions, verbosity, out_path, all_ids):
        super().__init__(stream, descriptions, verbosity)
        self.out_path = out_path
        self.records: dict[str, dict] = {}
        self.class_errors: dict[str, dict] = {}
        self.all_ids = all_ids
        self._t0: dict[str, float] = {}
        self._flush()

    def _flush(self):
        tmp = self.out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"tests": self.records, "class_errors": self.class_errors, "all_ids": self.all_ids},
                f,
                indent=1,
            )
        os.replace(tmp, self.out_path)

    def _put(self, test, outcome, message=""):
        tid = test.id()
        if tid in self.all_ids or hasattr(test, "_testMethodName"):
            prev = self.records.get(tid)
            if prev and prev["outcome"] in ("fail", "error") and outcome == "pass":
                return  # a failed subTest already decided it
            self.records[tid] = {
                "outcome": outcome,
                "seconds": round(time.monotonic() - self._t0.get(tid, time.monotonic()), 1),
                "message": message[-6000:],
            }
        else:  # setUpClass / tearDownClass / module-level: an _ErrorHolder whose id() is a description
            self.class_errors[tid] = {"outcome": outcome, "message": message[-6000:]}
        self._flush()

    def startTest(self, test):
        self._t0[test.id()] = time.monotonic()
        self.records[test.id()] = {"outcome": "running", "seconds": 0, "message": ""}
        self._flush()
        super().startTest(test)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._put(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._put(test, "fail", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        self._put(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._put(test, "skip", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._put(test, "xfail", self._exc_info_to_string(err, test))

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._put(test, "fail", "unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "fail" if issubclass(err[0], test.failureException) else "error"
            self._put(test, kind, f"{subtest.id()}\n" + self._exc_info_to_string(err, test))


def _iter_tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _iter_tests(t)
        else:
            yield t


def run_worker(path: str, out_path: str) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    except BaseException:
        with open(out_path, "w") as f:
            json.dump(
                {
                    "import_error": traceback.format_exc()[-6000:],
                    "tests": {},
                    "class_errors": {},
                    "all_ids": [],
                },
                f,
                indent=1,
            )
        traceback.print_exc()
        return 1
    suite = unittest.defaultTestLoader.loadTestsFromModule(mod)
    all_ids = [t.id() for t in _iter_tests(suite)]
    stream = unittest.runner._WritelnDecorator(sys.stderr)
    result = _RecordingResult(stream, True, 2, out_path, all_ids)
    suite.run(result)
    result.printErrors()
    return 0 if result.wasSuccessful() else 1


# ---- the driver ------------------------------------------------------------------------------------
def find_files(tests_dir: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(tests_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        out += [os.path.join(root, f) for f in sorted(files) if f.startswith("test_") and f.endswith(".py")]
    return sorted(out)


def classify(path: str) -> str | None:
    """None when the file drives a server; otherwise why it is not applicable."""
    src = open(path, encoding="utf-8").read()
    if not any(m in src for m in SERVER_MARKERS):
        mods = sorted(set(re.findall(r"^\s*from\s+(sglang[\w.]*)\s+import", src, re.M)))
        return (
            "not applicable: unit test of SGLang's own classes (imports " + ", ".join(mods) + "), no server"
        )
    return None


def _kill_tree(pid: int) -> None:
    try:
        import psutil

        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=15)
    except Exception:
        pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def run_file(path: str, rel: str, out_dir: str, timeout: float, env: dict) -> dict:
    stem = rel.replace(os.sep, "__")[:-3]
    log_path = os.path.join(out_dir, stem + ".log")
    json_path = os.path.join(out_dir, stem + ".json")
    if os.path.exists(json_path):
        os.remove(json_path)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", path, json_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=os.path.dirname(path),
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc.pid)
            proc.wait()
        # whatever the worker left behind (a server it did not stop)
        _kill_tree(proc.pid)
    data = {"tests": {}, "class_errors": {}, "all_ids": []}
    if os.path.exists(json_path):
        with open(json_path) as f:
            data = json.load(f)
    tests = data.get("tests", {})
    for tid in data.get("all_ids", []):
        rec = tests.get(tid)
        if rec is None or rec["outcome"] == "running":
            cls = tid.rsplit(".", 1)[0]
            holder = next(
                (
                    v
                    for k, v in data.get("class_errors", {}).items()
                    if k.startswith("setUpClass") and cls in k
                ),
                None,
            )
            if rec is not None and timed_out:
                tests[tid] = {
                    "outcome": "timeout",
                    "seconds": round(time.monotonic() - t0, 1),
                    "message": f"killed by the per-file timeout ({timeout:.0f}s) while running",
                }
            elif holder is not None:
                tests[tid] = {
                    "outcome": "error" if holder["outcome"] == "error" else holder["outcome"],
                    "seconds": 0,
                    "message": "setUpClass: " + holder["message"],
                }
            elif timed_out:
                tests[tid] = {
                    "outcome": "not run",
                    "seconds": 0,
                    "message": "per-file timeout hit before it ran",
                }
            else:
                tests[tid] = {"outcome": "not run", "seconds": 0, "message": "no outcome recorded"}
    notes = []
    with open(log_path, errors="replace") as f:
        for line in f:
            if (
                "radixserve: error" in line
                or "[sglang-compat] dropped" in line
                or "error: unrecognized arguments" in line
                or "[sglang-compat] '" in line
            ):
                line = line.strip()
                if line not in notes:
                    notes.append(line)
    launch = [n for n in notes if "error" in n]
    if launch:  # say why a server did not start next to each test that it stopped
        for rec in tests.values():
            if "Server process exited" in rec["message"]:
                rec["message"] += "\nserver: " + " / ".join(launch)
    return {
        "file": rel,
        "seconds": round(time.monotonic() - t0, 1),
        "timed_out": timed_out,
        "returncode": proc.returncode,
        "import_error": data.get("import_error"),
        "tests": tests,
        "class_errors": data.get("class_errors", {}),
        "notes": notes,
        "log": log_path,
    }


def _short(msg: str) -> str:
    lines = [ln.strip() for ln in (msg or "").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    tail = lines[-1]
    return (tail[:300] + "...") if len(tail) > 300 else tail


def write_summary(results: list[dict], out_dir: str, args) -> str:
    rows = ["| file::test | result | seconds | message |", "| --- | --- | --- | --- |"]
    counts: dict[str, int] = {}
    for r in results:
        if r.get("not_applicable"):
            rows.append(f"| {r['file']} | n/a | 0 | {r['not_applicable']} |")
            counts["n/a"] = counts.get("n/a", 0) + 1
            continue
        if r.get("import_error"):
            rows.append(f"| {r['file']} | error (import) | {r['seconds']} | {_short(r['import_error'])} |")
            counts["error"] = counts.get("error", 0) + 1
        for tid, rec in r["tests"].items():
            short = tid.split(".", 1)[1] if "." in tid else tid
            counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
            msg = _short(rec["message"]).replace("|", "\\|")
            rows.append(f"| {r['file']}::{short} | {rec['outcome']} | {rec['seconds']} | {msg} |")
    head = [
        f"# SGLang OpenAI-server tests against radixserve ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"tests dir: {args.tests_dir}; unknown flags: {args.unknown_flags}; "
        f"timeout per file: {args.timeout_per_file:.0f}s; radixserve: {args.radixserve_at}",
        "",
        "totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
    ]
    notes = []
    for r in results:
        for n in r.get("notes", []):
            notes.append(f"- {r['file']}: `{n[:300]}`")
        if r.get("timed_out"):
            notes.append(f"- {r['file']}: per-file timeout hit after {r['seconds']}s")
    text = "\n".join(head + rows + ([""] + ["## launch notes", ""] + notes if notes else [])) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return run_worker(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tests_dir")
    p.add_argument("--out", default="/tmp/sglang_compat_results")
    p.add_argument("--timeout-per-file", type=float, default=900)
    p.add_argument("--only", nargs="*", default=[], help="run only files whose path contains one of these")
    p.add_argument("--skip", nargs="*", default=[], help="skip files whose path contains one of these")
    p.add_argument(
        "--unknown-flags",
        choices=("pass", "drop"),
        default="pass",
        help="pass: give radixserve every flag a test passes (unknown ones stop the server); "
        "drop: leave out the flags radixserve does not know",
    )
    p.add_argument("--port", type=int, default=21000)
    p.add_argument(
        "--radixserve-src",
        default=None,
        help="a folder holding a radixserve/ package to test instead of the installed one (e.g. a "
        "`git archive HEAD radixserve` export, so edits in progress do not disturb a run)",
    )
    p.add_argument("--list", action="store_true", help="only list the files and how each is classified")
    args = p.parse_args(argv)

    tests_dir = os.path.abspath(args.tests_dir)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ)
    front = [SHIM] + ([os.path.abspath(args.radixserve_src)] if args.radixserve_src else [])
    env["PYTHONPATH"] = os.pathsep.join(front + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    where = subprocess.run(
        [sys.executable, "-c", "import radixserve; print(radixserve.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    ).stdout.strip()
    args.radixserve_at = where or "(radixserve not importable)"
    print(f"radixserve under test: {args.radixserve_at}", flush=True)
    env["SGLANG_COMPAT_KITS_DIR"] = os.path.join(tests_dir, "_kits")
    env["SGLANG_COMPAT_UNKNOWN_FLAGS"] = args.unknown_flags
    env["SGLANG_COMPAT_PORT"] = str(args.port)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"

    results = []
    for path in find_files(tests_dir):
        rel = os.path.relpath(path, tests_dir)
        if args.only and not any(s in rel for s in args.only):
            continue
        if any(s in rel for s in args.skip):
            continue
        why = classify(path)
        if args.list:
            print(f"{rel}: {why or 'server-driving: run'}")
            continue
        if why:
            results.append({"file": rel, "not_applicable": why, "tests": {}})
            print(f"== {rel}: {why}", flush=True)
            continue
        print(f"== {rel}: running (timeout {args.timeout_per_file:.0f}s)", flush=True)
        r = run_file(path, rel, args.out, args.timeout_per_file, env)
        outcomes = {}
        for rec in r["tests"].values():
            outcomes[rec["outcome"]] = outcomes.get(rec["outcome"], 0) + 1
        print(
            f"   {r['seconds']}s {'TIMEOUT ' if r['timed_out'] else ''}{outcomes} log: {r['log']}", flush=True
        )
        results.append(r)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    if args.list:
        return 0
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(write_summary(results, args.out, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
