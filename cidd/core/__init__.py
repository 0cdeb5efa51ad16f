"""cidd's pure core: the node state machine, captures, windows, rights and boot profiles.

Events in, actions out: nothing here imports Twisted, sqlite3 or socket (``make lint`` checks it), and clocks
are passed in, so every rule is tested without a reactor.
"""
