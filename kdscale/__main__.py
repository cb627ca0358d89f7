from kdscale.cli import entry

entry()
