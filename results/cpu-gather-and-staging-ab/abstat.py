import re,sys,statistics as st
cur=None; rows={}
for line in open(sys.argv[1]):
    if line.startswith('=='): cur=line[3:].strip(); rows[cur]=[]; continue
    m=re.match(r'(\w+) cpu-time median ([\d.]+) ms min ([\d.]+)',line)
    if m: rows[cur].append((m.group(1),float(m.group(2)),float(m.group(3))))
for k,v in rows.items():
    b=[x for x in v if x[0]=='base']; n=[x for x in v if x[0]=='new']
    if not n: continue
    rat=[nn[1]/bb[1] for bb,nn in zip(b,n)]
    print(f"{k:40s} base {st.median(x[1] for x in b):8.2f} new {st.median(x[1] for x in n):8.2f} ms  new/base per round median {st.median(rat):.3f} (min {min(rat):.2f} max {max(rat):.2f}, {len(rat)} rounds)")
