"""Engine emulators: vLLM, TGI and SGLang HTTP surfaces over one roofline-timed engine core.

The core (:mod:`.engine`) is a pure state machine driven by a clock it is handed, so the
same code runs behind real HTTP in real time (:mod:`.instance`) and in virtual time
(:mod:`.virtual`, used by the calibration benchmark and later the simulator).
"""
