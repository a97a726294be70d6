"""``python -m pkt`` = the ``pkt`` command."""

from pkt.cli import main

main()
