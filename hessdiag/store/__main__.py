"""``python -m hessdiag.store compact STORE``: merge the journal into the main file, so that
the main file alone holds every record (for h5py and tools that know nothing of the
journal). ``python -m hessdiag.store pending STORE`` prints how many records wait in the
journal."""

from __future__ import annotations

import sys

from hessdiag.store import Store, StoreError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("compact", "pending"):
        print("usage: python -m hessdiag.store {compact,pending} STORE", file=sys.stderr)
        return 2
    store = Store(args[1])
    try:
        if args[0] == "compact":
            merged = store.pending()
            store.compact()
            print(f"{args[1]}: {merged} journal records merged; the file holds every record")
        else:
            print(store.pending())
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
