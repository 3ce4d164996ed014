"""One module per step of a backup: its real work (dump, compress, verify, upload, rotate, notify).
"""
