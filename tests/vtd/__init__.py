"""Tests of the Intel VT-d model: decoding, frontend rules, topology, dispatch, replay."""
