from kvmpod.oci_runtime.cli import entry

entry()
