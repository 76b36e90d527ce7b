"""upstream_compressed: compressed Transformer speech upstreams for S3PRL.

Importing this package is cheap: it does not import S3PRL. Call :func:`register` to add the
upstream entries to ``s3prl.hub``.
"""

__version__ = "0.1.0"
