"""Shipped configs; a package only so that example judges under ``configs/examples`` import by dotted path."""
