"""Command-line front-ends: the modern ``blktap`` command and the drop-in ``vhd-util``."""
