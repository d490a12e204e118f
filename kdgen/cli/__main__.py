"""`python -m kdgen.cli ...` is `kdgen ...`."""

from kdgen.cli.main import main

if __name__ == "__main__":  # vLLM spawns processes that import this module: keep the guard
    main()
