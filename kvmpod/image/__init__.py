"""App Container images: reading ACIs, their manifests, and building new ones."""
