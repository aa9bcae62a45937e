"""``python -m hessdiag``: the command line."""

from hessdiag.cli.app import main

if __name__ == "__main__":
    main()
