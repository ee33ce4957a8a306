"""Engine: the synchronous core and its front ends."""
