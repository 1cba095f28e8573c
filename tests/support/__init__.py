"""What the tests share: the proxy as a process or a thread, configs, peers, wire helpers.

Test modules import from here (never from each other); conftest.py holds only fixtures.
"""
