#!/usr/bin/env python3
"""rewrite_launches.py IN.cu OUT.cpp - turn CUDA's launch syntax into calls the CPU emulation
(emu_device.h) understands: k<<<g, b, shm, st>>>(args); -> emu_launch(k, g, b, shm, st, args);
and the dynamic shared array into the emulation's buffer."""
import re
import sys

src = open(sys.argv[1]).read()
launch = re.compile(r'(\w+(?:<[^<>]*>)?)\s*<<<(.*?)>>>\((.*?)\);', re.S)
out, n = launch.subn(lambda m: 'emu_launch(%s, %s, %s);' % (m.group(1), m.group(2), m.group(3)), src)
out = out.replace('extern __shared__ float smem[];', 'float *smem = (float *)emu_dyn_smem;')
if n == 0 or '<<<' in out:
    sys.exit('rewrite_launches: launches not rewritten')
open(sys.argv[2], 'w').write('/* generated from %s by rewrite_launches.py */\n#line 1 "%s"\n' % (sys.argv[1], sys.argv[1]) + out)
