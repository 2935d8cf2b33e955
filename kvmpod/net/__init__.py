"""Pod networking (docs/networking.md): --net none | user | default | CNI networks, ports, DNS."""
