import sys

from proxy.cli import main

# The guard matters: vLLM's in-process engine starts its workers with "spawn", which
# re-imports the main module in each child.
if __name__ == "__main__":
    sys.exit(main())
