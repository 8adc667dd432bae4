%% Routes and JSON bodies of the HTTP endpoint.
-module(thermo_api).
-vsn("@VSN@").

-export([handle/2, encode_json/1]).

%% Callers must see a broken node as unhealthy, not hang on it: a suspended
%% or dead state process makes /health answer 503 quickly.
-define(STATE_TIMEOUT, 2000).

-spec handle(atom() | binary(), binary()) -> {100..599, map()}.
handle('GET', <<"/health">>) ->
    health();
handle('GET', <<"/state">>) ->
    {200, thermo_state:get()};
handle('POST', <<"/incr">>) ->
    {200, thermo_state:incr()};
handle(_Method, Path) when Path =:= <<"/health">>; Path =:= <<"/state">>; Path =:= <<"/incr">> ->
    {405, #{error => <<"method not allowed">>}};
handle(_Method, _Path) ->
    {404, #{error => <<"not found">>}}.

health() ->
    {ok, Vsn} = application:get_key(thermo, vsn),
    Base = #{
        version => list_to_binary(Vsn),
        node => atom_to_binary(node()),
        os_pid => list_to_binary(os:getpid())
    },
    State =
        try gen_server:call(thermo_state, get, ?STATE_TIMEOUT) of
            Map -> {ok, Map}
        catch
            exit:Reason -> {error, Reason}
        end,
    case {State, thermo_health:check()} of
        {{ok, #{counter := Counter}}, ok} ->
            {200, Base#{status => <<"ok">>, counter => Counter}};
        {{ok, #{counter := Counter}}, {failing, Why}} ->
            {503, Base#{status => <<"failing">>, counter => Counter, reason => Why}};
        {{error, Why}, _} ->
            {503, Base#{status => <<"failing">>, reason => format(Why)}}
    end.

format(Term) ->
    iolist_to_binary(io_lib:format("~0p", [Term])).

%% --- JSON encoding (OTP 25 has no json module) ---

-spec encode_json(term()) -> iodata().
encode_json(Map) when is_map(Map) ->
    Pairs = [[encode_string(key(K)), $:, encode_json(V)] || {K, V} <- lists:sort(maps:to_list(Map))],
    [${, lists:join($,, Pairs), $}];
encode_json(List) when is_list(List) ->
    [$[, lists:join($,, [encode_json(V) || V <- List]), $]];
encode_json(true) -> <<"true">>;
encode_json(false) -> <<"false">>;
encode_json(null) -> <<"null">>;
encode_json(undefined) -> <<"null">>;
encode_json(Atom) when is_atom(Atom) -> encode_string(atom_to_binary(Atom));
encode_json(Int) when is_integer(Int) -> integer_to_binary(Int);
encode_json(Float) when is_float(Float) -> float_to_binary(Float, [short]);
encode_json(Bin) when is_binary(Bin) -> encode_string(Bin).

key(K) when is_atom(K) -> atom_to_binary(K);
key(K) when is_binary(K) -> K.

encode_string(Bin) ->
    [$", [escape(C) || <<C/utf8>> <= Bin], $"].

escape($") -> <<"\\\"">>;
escape($\\) -> <<"\\\\">>;
escape($\n) -> <<"\\n">>;
escape($\r) -> <<"\\r">>;
escape($\t) -> <<"\\t">>;
escape(C) when C < 16#20 -> io_lib:format("\\u~4.16.0b", [C]);
escape(C) -> <<C/utf8>>.
