"""Install, update and remove the guestlink agent inside VM disk images, offline.

``tree`` works on a mounted guest root directory (manifest, init detection, generated files);
``backends`` gets an image's root filesystem mounted (nbd, loop, guestfs) with every step undone
through one ExitStack; ``disk`` reads formats, locks and partition tables; ``guestlink image`` is
guestlink.cli.image.
"""
