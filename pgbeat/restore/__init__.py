"""The restore side: restores with a safety net, their crash journal, and restore drills.
"""
