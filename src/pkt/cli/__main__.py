"""``python -m pkt.cli`` = the ``pkt`` command."""

from pkt.cli import main

main()
