import cProfile, pstats, sys, time, io
sys.argv=["x","memory","--simulate","350M","--batch","1","--seq-len","64","--precisions","int8","--optimizers","matrixopt.Muon","--out","/tmp/simout","--threads","1"]
from benchmarks.__main__ import main
import benchmarks.simulate as sim
orig = sim.sim_rows
sim.sim_rows = lambda *a, **k: [r for r in orig(*a, **k) if r.row.in_backward and r.row.master_weights is None][:1]
pr=cProfile.Profile(); pr.enable(); main(sys.argv[1:]); pr.disable()
out=io.StringIO(); st=pstats.Stats(pr, stream=out); st.sort_stats("cumulative").print_stats(r"work/main/(optim|benchmarks|kernels)", 45)
open("/tmp/prof2.txt","w").write(out.getvalue())
