"""What pgbeat reports: status, Prometheus metrics, and warnings that are not failures.
"""
