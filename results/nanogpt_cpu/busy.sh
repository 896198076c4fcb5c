#!/bin/bash
# prints summed %CPU of processes with nice < 10 over a 2 s window (excluding top itself)
top -b -n 2 -d 2 -w 200 | awk '/^top -/{f++} f==2 && $1 ~ /^[0-9]+$/ && $4 < 10 && $12 != "top" {s+=$9} END{print s+0}'
