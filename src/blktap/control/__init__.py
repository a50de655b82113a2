"""The tapdisk control protocol (the reference's binary messages over AF_UNIX)."""
