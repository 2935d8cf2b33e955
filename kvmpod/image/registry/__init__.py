"""Pulling images from an OCI distribution / Docker registry v2 (`docker://`), docs/store.md.

    ref = parse_docker_reference("docker://127.0.0.1:5000/busybox:latest")
    client = RegistryClient(ref, transfer, limits)
    pulled = pull_layout(ref, client, layout_dir, cached=..., temp_file=...)

reference.py parses the reference the way docker and skopeo do, auth.py finds credentials in the
usual auth.json / ~/.docker/config.json and reads WWW-Authenticate challenges, client.py talks to
the registry over urllib (bearer tokens, basic auth, redirects, digests checked while the bytes
arrive), pull.py resolves the image to its linux/amd64 manifest and writes an OCI image layout
that the OCI -> ACI converter (kvmpod/image/oci) reads like any other.
"""
