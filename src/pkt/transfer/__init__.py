"""Transfer through what layers compute: the teacher's task vector or its layer outputs carried into the student
through calibration activations (function-transfer) or through the shared vocabulary (SemAlign), not through
weight coordinates. Above ``pkt.align`` and ``pkt.analyse``, whose training and representation tools it uses."""
