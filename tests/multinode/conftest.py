"""Tests that start their own multi-node Ray cluster on this machine (`ray start` processes): they
never use the session's local Ray, and stop only the processes they started."""
