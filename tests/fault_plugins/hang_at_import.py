"""A plugin whose import never ends in reasonable time (a network call that hangs, say)."""

import time

time.sleep(3600)
