"""Print the requirements pyproject.toml declares, one per line, for a dependency-only layer.

    python requirements.py pyproject.toml [EXTRA,...]

The image installs these before it copies the code, so a code change reuses the cached layer.
An unknown extra is an error, not an empty set.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: str) -> list[str]:
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    wanted = [name.strip() for name in extras.split(",") if name.strip()]
    optional = project.get("optional-dependencies", {})
    unknown = [name for name in wanted if name not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no optional dependency group {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(optional))}")
    return [*project["dependencies"], *(req for name in wanted for req in optional[name])]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")))
