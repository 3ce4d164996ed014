"""What a backup is: its manifest, its name, where it is on the shelf.
"""
