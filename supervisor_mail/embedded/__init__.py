"""Local servers on loopback for the demo and the test suite."""
