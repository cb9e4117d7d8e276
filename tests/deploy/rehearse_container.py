"""Rehearse the Dockerfile without Docker: its build steps, then its CMD and HEALTHCHECK.

    python -m tests.deploy.rehearse_container        (as root: it switches users, namespaces)

Reads ``Dockerfile`` (``tests.deploy.dockerfile``), copies the build context as
``.dockerignore`` filters it into a temporary root, runs the ``RUN``/``COPY``/``WORKDIR``
steps of the stage the image copies from, with the image's absolute paths moved under that
root and a fresh virtual environment (so nothing of this checkout's environment is used).
Then, in a network namespace of its own (so the image's port 8080 is free), it starts the
image's ``CMD`` as the image's numeric ``USER`` with the image's ``ENV`` and the built-in
``mock`` config at ``MODEL_BACKEND_CONFIG``, polls the ``HEALTHCHECK`` command until it
succeeds, sends one authenticated request, and stops the server with SIGTERM (exit 0).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.deploy.dockerfile import Stage, context_files, parse

ROOT = Path(__file__).resolve().parents[2]
#: Folders of the image's file system; under the rehearsal's root here.
IMAGE_DIRS = ("/opt", "/src", "/etc/model-proxy")
API_KEY = "rehearsal-key"
SYSTEM_PYTHON = "/usr/bin/python3"


def relocate(value: str, root: Path) -> str:
    pattern = "|".join(re.escape(d) for d in IMAGE_DIRS)
    return re.sub(rf"(?<![\w./-])({pattern})(?=/|\b|$)", lambda m: f"{root}{m.group(1)}", value)


def build(stage: Stage, root: Path, context: Path) -> None:
    env = {**stage.env, **stage.args}
    workdir = root
    for word, rest in stage.steps:
        if word == "WORKDIR":
            workdir = Path(relocate(rest, root))
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            *sources, target = rest.split()
            assert not any(s.startswith("--") for s in sources), f"COPY {rest}: flags in a build"
            dest = workdir / target
            for source in sources:
                origin = context / source
                assert origin.exists(), f"COPY {source}: not in the build context"
                if origin.is_dir():
                    shutil.copytree(origin, dest if not target.endswith("/") else dest / source,
                                    dirs_exist_ok=True)
                else:
                    place = dest / origin.name if target.endswith("/") else dest
                    place.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, place)
        elif word == "RUN":
            command = relocate(rest, root)
            run_env = {k: relocate(v, root) for k, v in env.items()}
            print(f"+ RUN {rest}", flush=True)
            done = subprocess.run(["sh", "-ec", command], cwd=workdir, env=run_env,
                                  capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"RUN {rest}: exit {done.returncode}")
        else:
            raise AssertionError(f"{word} in a build stage: the rehearsal does not know it")


def main() -> int:
    if os.geteuid() != 0:
        print("rehearse_container: run as root (it starts the server as the image's USER)")
        return 2
    with tempfile.TemporaryDirectory(prefix="image-") as tmp:
        return rehearse(Path(tmp))


def rehearse(root: Path) -> int:
    # The base image's Python: the system one of the same minor version, not this checkout's.
    base_bin = root / "usr-local-bin"
    base_bin.mkdir()
    for name in ("python", "python3"):
        (base_bin / name).symlink_to(SYSTEM_PYTHON)
    base_env = {"PATH": f"{base_bin}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    stages = parse(ROOT / "Dockerfile", base_env)
    tag = re.search(r"python:(\d+\.\d+)", stages[0].base)
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert tag and tag.group(1) == version, f"{SYSTEM_PYTHON} is {version}: {stages[0].base}"
    final = stages[-1]
    copies = [rest for word, rest in final.steps if word == "COPY"]
    assert len(copies) == 1 and copies[0].startswith("--from="), final.steps
    source_stage, image_path, target = copies[0].split()
    assert image_path == target, "the venv must sit at the same path in both stages"
    builder = next(s for s in stages if s.name == source_stage.removeprefix("--from="))
    assert final.user and final.user.split(":")[0].isdigit(), f"USER {final.user}: not numeric"
    assert final.cmd and final.healthcheck

    context = root / "context"
    for name in context_files(ROOT):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    build(builder, root, context)
    config = Path(relocate(final.env["MODEL_BACKEND_CONFIG"], root))
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text((ROOT / "config/examples/mock.yaml").read_text()
                      + f"auth:\n  api_keys: [{API_KEY}]\n")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    env = {k: relocate(v, root) for k, v in final.env.items()}
    spec = {"env": env, "user": final.user, "cmd": final.cmd,
            "healthcheck": final.healthcheck, "start_period": final.healthcheck_options.get(
                "start-period", "30s"), "port": final.expose[0]}
    # a network namespace of its own: port 8080 is free there, and nothing reaches in
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "tests.deploy.rehearse_container",
         "--inside", json.dumps(spec)], cwd=ROOT, timeout=180, check=False)
    return result.returncode


def inside(spec: dict[str, Any]) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    uid, _, gid = str(spec["user"]).partition(":")
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups", "--"]
    env = dict(spec["env"])
    server = subprocess.Popen([*as_user, *spec["cmd"]], env=env)
    try:
        deadline = time.monotonic() + float(str(spec["start_period"]).removesuffix("s"))
        while True:
            check = subprocess.run([*as_user, *spec["healthcheck"]], env=env,
                                   capture_output=True, timeout=30, check=False)
            if check.returncode == 0:
                break
            assert server.poll() is None, f"the server exited with {server.returncode}"
            assert time.monotonic() < deadline, f"HEALTHCHECK kept failing: {check.stderr!r}"
            time.sleep(0.3)
        print(f"HEALTHCHECK passed as uid {uid}", flush=True)
        request = urllib.request.Request(
            f"http://127.0.0.1:{spec['port']}/v1/chat/completions",
            data=json.dumps({"model": "mock-model",
                             "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            answer = json.load(resp)
        assert answer["choices"][0]["message"]["content"], answer
        owner = subprocess.run(["ps", "-o", "uid=", "-p", str(server.pid)],
                               capture_output=True, text=True, check=False).stdout.strip()
        print(f"chat completion answered; server uid {owner or '?'}", flush=True)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        assert code == 0, f"SIGTERM: exit {code}"
        print("stopped cleanly on SIGTERM", flush=True)
        return 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inside":
        sys.exit(inside(json.loads(sys.argv[2])))
    sys.exit(main())
