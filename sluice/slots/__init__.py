"""Pieces into slot files: compress, fenced appends under slot leases, the seal policy, and the
registry of sealed files awaiting upload."""
