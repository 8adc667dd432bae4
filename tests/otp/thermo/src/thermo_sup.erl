-module(thermo_sup).
-behaviour(supervisor).
-vsn("@VSN@").

-export([start_link/0, init/1]).

start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

init([]) ->
    Children = [
        #{id => thermo_state, start => {thermo_state, start_link, []}},
        #{id => thermo_http, start => {thermo_http, start_link, []}}
    ],
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, Children}}.
