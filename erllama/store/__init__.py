"""The model store: named models (``name:tag``) as manifests over content-addressed, sha256-verified blobs."""
