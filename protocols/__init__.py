"""Binary formats of viommud, declared with construct.

This package is the readable specification: every declaration cites the section of the
architecture or uAPI document it mirrors. Hot paths decode with ``struct`` and masks; tests
prove those fast decoders agree with these declarations. No ``construct.Container`` leaves
the helpers defined here: they convert to plain dicts or frozen dataclasses.
"""
