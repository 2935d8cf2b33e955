from kvmpod.cli import entry

entry()
