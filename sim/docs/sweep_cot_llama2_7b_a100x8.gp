set terminal png noenhanced size 900,560
set output 'sim/docs/sweep_cot_llama2_7b_a100x8.png'
set logscale y
set xlabel 'load (requests/s)'
set ylabel 'p99 TTFT (ms)'
set key top left
set grid
plot 'sim/docs/sweep_cot_llama2_7b_a100x8.dat' using 1:2 with linespoints title 'recompute', 'sim/docs/sweep_cot_llama2_7b_a100x8.dat' using 1:3 with linespoints title 'swap', 'sim/docs/sweep_cot_llama2_7b_a100x8.dat' using 1:4 with linespoints title 'migrate', 'sim/docs/sweep_cot_llama2_7b_a100x8.dat' using 1:5 with linespoints title 'kunserve', 'sim/docs/sweep_cot_llama2_7b_a100x8.dat' using 1:6 with linespoints title 'kunserve@g2'
