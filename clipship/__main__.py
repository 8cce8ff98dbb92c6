"""`python -m clipship`: the command line."""

from clipship.cli import main

main()
