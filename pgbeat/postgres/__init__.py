"""Talking to PostgreSQL: connections and libpq environments, client programs, pg_dump's options, the dump
scanner, the server's clock.
"""
