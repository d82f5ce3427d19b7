"""`msnc` as a script path, for launchers (msrun) that start a file rather than a console entry point."""
import sys

from ms_nlp_compress.cli import main

if __name__ == "__main__":
    sys.exit(main())
