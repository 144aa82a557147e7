"""The megascope wire protocol: .proto sources and generated code in ``megascope.protos.megascope.v1``.

Regenerate with ``python -m megascope.protos.generate`` (see that module for the layout).
"""
