"""The Kimi K2.5 / Kimi-VL family (``family.py`` declares it; ``config.py``, ``costs.py``)."""
