"""Container networking primitives: the engine composes these into network modes.

| module | job |
|---|---|
| ``netns`` | namespaces as descriptors, work done from threads inside them, sysctls |
| ``rtnl`` | a small synchronous rtnetlink client (pyroute2's codecs, no event loop) |
| ``names`` | host-side interface names derived from container names |
| ``link`` | routed and bridged veths, bridges, port isolation, proxy ARP/NDP, teardown |
| ``nft`` | kamra's own nftables table: NAT, port forwards, isolation as set elements |
| ``tc`` | per-container bandwidth limits (htb, ifb for what the container sends) |
| ``ipam`` | address pools and validation (pure logic) |
| ``check`` | other firewalls that would drop forwarded container traffic |

Everything acts on the network namespace of the calling thread (kamrad's, or a test's
own) and never spawns a process on the container start path.
"""
